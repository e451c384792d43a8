#!/usr/bin/env bash
# The CPU distillation experiment of docs/distill.md: two teachers, five DMD runs, FID, spectra, report files.
#
#     bash docs/distill/experiment.sh          # from the repository root; rerun it after a stop to resume
#
# Every step is skipped when its output exists, and an unfinished training or distillation resumes from its
# last checkpoint (--resume auto), so the script can be stopped and restarted at any time. Two jobs run at a
# time with one thread each (2 CPU cores). Results go to results/ (git-ignored); the small files behind the
# numbers (logs, fid.json, spectrum.json, grids and the spectrum figure) are copied to docs/distill/.
#   teachers     SiT-T/4 on Fashion-MNIST, train.py defaults (1,500 steps, batch 64): residual, DAR static chunk 4
#   distillation distill.py defaults (one-step G, 1,000 generator updates, batch 64, one fake update each):
#                residual -> residual and DAR c4 -> DAR c4 (seeds 0 and 1), residual -> DAR c4 student (seed 0)
#   scoring      1,000 samples each (sample.py, seeds 0..999): the teachers with Heun 25 steps and with one
#                Euler step (the generators' starting point), the generators with their one step; FID against
#                1,000 training images (fid.py, whose README floor for 1,000 real test images is 22.11);
#                the high-frequency ratio against the Fashion-MNIST test split (diagnose.py --spectrum)
set -euo pipefail
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
R=results
OUT=docs/distill
mkdir -p "$R" "$OUT/runs"

TEACHER_RES=$R/SiT-T-4-residual
TEACHER_DAR=$R/SiT-T-4-dar-static-c4

timed() {  # timed NAME COMMAND...: run, append the output to $R/NAME.out and the wall time to $R/NAME.time
    local name=$1; shift
    local start=$SECONDS
    "$@" >> "$R/$name.out" 2>&1
    echo $((SECONDS - start)) >> "$R/$name.time"
}

# 1. Teachers (each prints "nothing to do" once finished).
timed teacher-residual python train.py --router residual --resume auto &
timed teacher-dar python train.py --router dar --chunk 4 --resume auto &
wait

# 2. Distillation, two at a time.
distill_run() {  # distill_run NAME TEACHER FLAGS...
    local name=$1 teacher=$2; shift 2
    timed "$name" python distill.py --teacher "$teacher" --run-name "$name" --resume auto "$@"
}
distill_run dmd-residual-s0 "$TEACHER_RES" --seed 0 &
distill_run dmd-dar-c4-s0 "$TEACHER_DAR" --seed 0 &
wait
distill_run dmd-residual-to-dar-c4-s0 "$TEACHER_RES" --router dar --chunk 4 --seed 0 &
distill_run dmd-residual-s1 "$TEACHER_RES" --seed 1 &
wait
distill_run dmd-dar-c4-s1 "$TEACHER_DAR" --seed 1

# 3. Samples (1,000 each, seeds 0..999) and FID against 1,000 training images, two at a time.
sample_npz() {  # sample_npz NAME CHECKPOINT_OR_RUN FLAGS...: results/scores/NAME.npz
    local name=$1 ckpt=$2; shift 2
    [ -f "$R/scores/$name.npz" ] || python sample.py --ckpt "$ckpt" --num-samples 1000 --batch-size 100 \
        --device cpu --out "$R/scores/$name.npz" "$@"
}
score() {  # score NAME CHECKPOINT_OR_RUN FLAGS...: the npz, then its fid.json
    local name=$1
    sample_npz "$@"
    [ -f "$R/scores/$name.fid.json" ] || python fid.py "$R/scores/$name.npz" --ref fashion-mnist \
        --ref-samples 1000 --device cpu --json "$R/scores/$name.fid.json"
}
mkdir -p "$R/scores"
score teacher-residual-heun25 "$TEACHER_RES" --sampler heun --steps 25 > "$R/scores.out" 2>&1  # caches the reference
score teacher-dar-c4-heun25 "$TEACHER_DAR" --sampler heun --steps 25 >> "$R/scores.out" 2>&1 &
score teacher-residual-euler1 "$TEACHER_RES" --sampler euler --steps 1 >> "$R/scores.out" 2>&1 &
wait
score teacher-dar-c4-euler1 "$TEACHER_DAR" --sampler euler --steps 1 >> "$R/scores.out" 2>&1 &
score dmd-residual-s0 "$R/dmd-residual-s0" >> "$R/scores.out" 2>&1 &
wait
score dmd-dar-c4-s0 "$R/dmd-dar-c4-s0" >> "$R/scores.out" 2>&1 &
score dmd-residual-to-dar-c4-s0 "$R/dmd-residual-to-dar-c4-s0" >> "$R/scores.out" 2>&1 &
wait
score dmd-residual-s1 "$R/dmd-residual-s1" >> "$R/scores.out" 2>&1 &
score dmd-dar-c4-s1 "$R/dmd-dar-c4-s1" >> "$R/scores.out" 2>&1 &
wait

# 4. High-frequency ratios and the report files.
python diagnose.py --out-dir "$OUT" --spectrum \
    "residual teacher, Heun 25=$R/scores/teacher-residual-heun25.npz" \
    "DAR c4 teacher, Heun 25=$R/scores/teacher-dar-c4-heun25.npz" \
    "residual teacher, 1 Euler step=$R/scores/teacher-residual-euler1.npz" \
    "DAR c4 teacher, 1 Euler step=$R/scores/teacher-dar-c4-euler1.npz" \
    "DMD residual s0=$R/scores/dmd-residual-s0.npz" "DMD residual s1=$R/scores/dmd-residual-s1.npz" \
    "DMD DAR c4 s0=$R/scores/dmd-dar-c4-s0.npz" "DMD DAR c4 s1=$R/scores/dmd-dar-c4-s1.npz" \
    "DMD residual -> DAR c4 s0=$R/scores/dmd-residual-to-dar-c4-s0.npz" | tee "$OUT/spectrum.txt"
for run in SiT-T-4-residual SiT-T-4-dar-static-c4 dmd-residual-s0 dmd-residual-s1 dmd-dar-c4-s0 dmd-dar-c4-s1 \
           dmd-residual-to-dar-c4-s0; do
    mkdir -p "$OUT/runs/$run"
    cp "$R/$run/log.jsonl" "$R/$run/samples.png" "$OUT/runs/$run/"
done
cp "$R"/scores/*.fid.json "$R"/scores/*.png "$R"/*.time "$OUT/runs/"
echo "done: numbers in $OUT/runs/*.fid.json, $OUT/spectrum.txt; costs (seconds) in $OUT/runs/*.time"
