#!/usr/bin/env bash
# The long end of the learning curve (docs/demo-recipe.md, "The learning curve of v7") on a lent GPU machine:
#
#   bash benchmarks/learning_curve_gpu.sh [spidr learning-curve options...]
#   bash benchmarks/learning_curve_gpu.sh --fetch-debs     # here, on Debian 12: the voice packages into .debs/
#
# Default grid: 4 h and 16 h of training audio × 8,800 and 35,200 steps (4× and 16× the demo), seed 0, the four
# runs side by side on the one GPU, in runs/curve-gpu (kept between calls while the machine stays warm: a rerun
# resumes). The whole grid needs more than one device command (at most 10 minutes): the run stops
# $CURVE_LIMIT_S (default 540) seconds after the script started, and whatever is finished by then (each point's
# point.json and report.md, in one points.tar: the machine brings back at most 8 files; and a curve.md / curve.json /
# curve.png of the finished points) is copied to $OUT when it is set, on any exit. The
# corpus voices (flite, festival, espeak-ng) must be on that machine: installed, or Debian packages carried in
# .debs/ (name it in the run's carry). Those are unpacked under /tmp/voices, not into / (the device notes warn that
# packages unpacked there can break the machine): the programs run from there, festival's data through a link
# /usr/share/festival (made only when absent), espeak-ng's through ESPEAK_DATA_PATH, and only the shared libraries
# that the machine lacks are made known to the dynamic loader (one ld.so.conf.d entry: nothing the machine has is
# shadowed). The script stops if a voice program still lacks a library. Not run on a GPU yet.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
voice_programs=(flite festival espeak-ng)
voice_packages=(flite libflite1 festival libestools2.5 festlex-cmu festlex-poslex festvox-kallpc16k festvox-kdlpc16k
                festvox-us-slt-hts espeak-ng espeak-ng-data libespeak-ng1)
if [[ ${1:-} == --fetch-debs ]]; then
  # The voices and the package of every shared library the voice programs load here, but the C/C++ runtime.
  mapfile -t libraries < <(for program in "${voice_programs[@]}"; do ldd "$(command -v "$program")"; done \
                           | awk '/=> \//{print $3}' | sort -u)
  mapfile -t library_packages < <(for library in "${libraries[@]}"; do
                                    dpkg -S "$library" 2>/dev/null || dpkg -S "$(realpath "$library")"
                                  done | cut -d: -f1 | sort -u | grep -vxE 'libc6|libgcc-s1|libstdc\+\+6')
  mkdir -p .debs
  (cd .debs && apt-get download "${voice_packages[@]}" "${library_packages[@]}")
  du -sh .debs
  exit 0
fi
if ! command -v flite >/dev/null || ! command -v festival >/dev/null || ! command -v espeak-ng >/dev/null; then
  if ! compgen -G '.debs/*.deb' >/dev/null; then
    echo "$0: flite / festival / espeak-ng are missing and .debs/ holds no packages (--fetch-debs)" >&2
    exit 1
  fi
  voices=/tmp/voices
  for deb in .debs/*.deb; do dpkg -x "$deb" "$voices"; done
  mkdir -p "$voices/bin" "$voices/missing-libraries"
  # A library is known to the loader by its soname: Debian ships it as a link (libasound.so.2 -> libasound.so.2.0.0),
  # or as the file itself in a private folder (pulseaudio/libpulsecommon-16.1.so).
  known=$(ldconfig -p | awk 'NR > 1 {print $1}')
  for library in "$voices"/{usr/,}lib/x86_64-linux-gnu/*.so.* "$voices"/usr/lib/x86_64-linux-gnu/*/*.so; do
    [[ -L $library || $library == */*/*.so ]] && [[ -e $library ]] || continue
    grep -qxF "$(basename "$library")" <<<"$known" || ln -sf "$library" "$voices/missing-libraries/"
  done
  echo "$voices/missing-libraries" > /etc/ld.so.conf.d/zz-spidr-voices.conf
  ldconfig
  # festival and spidr look for its voices under /usr/share/festival: one link there, when the machine has none.
  [[ -e /usr/share/festival ]] || ln -s "$voices/usr/share/festival" /usr/share/festival
  ln -sf "$voices"/usr/bin/{flite,festival,espeak-ng} "$voices/bin/"
  export PATH="$voices/bin:$PATH" ESPEAK_DATA_PATH="$voices/usr/lib/x86_64-linux-gnu"
  for program in "${voice_programs[@]}"; do
    if ldd "$voices/usr/bin/$program" | grep -q 'not found'; then
      echo "$0: $program lacks shared libraries on this machine:" >&2
      ldd "$voices/usr/bin/$program" | grep 'not found' >&2
      exit 1
    fi
  done
fi
# shellcheck source=benchmarks/gpu_python.sh
source benchmarks/gpu_python.sh
work=runs/curve-gpu

copy_out() {  # what is finished, whatever ended the run
  [[ -n ${OUT:-} && -d $work/points ]] || return 0
  # A finished command wrote the curve itself (flagging points of another recipe); summarise only after a stop.
  if [[ ${status:-1} != 0 || ! -f $work/curve.md ]]; then
    "$python" -c 'import sys; from spidr.learning_curve_summary import write_curve; write_curve(sys.argv[1])' "$work" \
      || echo "$0: no finished point to summarise yet" >&2
  fi
  # Every point's record in one tar: the lent machine brings back at most 8 files from $OUT.
  (cd "$work" && find points -mindepth 2 -maxdepth 2 \( -name point.json -o -name report.md \) -print0 \
    | tar -cf "$OUT/points.tar" --null -T -) || true
  cp "$work"/curve.md "$work"/curve.json "$work"/curve.png "$OUT"/ 2>/dev/null || true
}
trap copy_out EXIT
# The limit counts from this script's start (unpacking voices, installing wheels); 20 s to stop, then copy_out.
limit=$(( ${CURVE_LIMIT_S:-540} - SECONDS ))
timeout --signal=INT --kill-after=20 $(( limit > 60 ? limit : 60 )) \
  "$python" -m spidr learning-curve --out "$work" --hours 4,16 --steps 8800,35200 --parallel 4 \
  --set 'run.device="cuda"' "$@" && status=0 || status=$?
exit "$status"
