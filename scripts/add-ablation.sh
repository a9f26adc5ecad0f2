#!/usr/bin/env bash
# ADD's ablation on the demo family (docs/DISTILL.md, "The ablation"): every arm starts from the same teacher
# (demo_models/base) with the same data, batch, learning rates and teacher guidance, runs concurrently on one
# GPU for MINUTES, and is then exported at the same step count S (the last checkpoint every arm reached) and
# at S/2, the two candidates per arm that the selection captions choose between. The export at S also holds
# what a `--student_init` continuation carries (its continuation/ folder), so that a later run goes on from it:
# with FROM=DIR every arm starts from DIR/ARM, an export-S folder of an earlier run, instead of the teacher.
#
#   bash scripts/add-ablation.sh WORK MINUTES [ARM ...]      # arms: old add distill adv add-v add-bal (default: all)
#   FROM=DIR bash scripts/add-ablation.sh WORK MINUTES ARM ... # go on from DIR/ARM (e.g. a copy of OLDWORK/ARM/export-S)
#
# COUNT (default 60000) sets the number of training images, EXTRA adds arguments to every run (a CPU check:
# COUNT=64 EXTRA="--batch_size 2 --num_workers 0" bash scripts/add-ablation.sh /tmp/abl 0.3).
#
# Then, on any machine: python3 -m sdxl_fast.shapes evaluate --student WORK/ARM/export-STEP --student-only ...
set -euo pipefail
work=${1:?usage: add-ablation.sh WORK MINUTES [ARM ...]}
minutes=${2:?usage: add-ablation.sh WORK MINUTES [ARM ...]}
shift 2
arms=("$@")
[ ${#arms[@]} -gt 0 ] || arms=(old add distill adv add-v add-bal)
every=${EVERY:-50}
mkdir -p "$work"

# The shipped student's last data: captions that leave out each optional attribute with probability 0.75.
data="$work/shapes-0.75"
if [ ! -f "$data/done" ]; then
  python3 -m sdxl_fast.shapes write --out "$data" --count "${COUNT:-60000}" --workers 16 --no-metadata \
      --omit-probability 0.75
  touch "$data/done"
fi

common=(--config configs/demo-student.toml --teacher demo_models/base --data "$data" --distill_space latent
        --teacher_guidance 6.5 --batch_size 128 --num_workers 3 --max_steps 1000000
        --checkpoint_every "$every" --keep_checkpoints 1000 --export_continuation false ${EXTRA:-})
from() { [ -z "${FROM:-}" ] || echo "--student_init $FROM/$1"; }
# The paper's discriminator and loss units; configs/demo-student.toml pins the shipped recipe's instead.
paper=(--disc_head stylegan_t --disc_head_channels 0 --disc_augment color,translation,cutout
       --distill_reduction sum --lambda_distill 2.5)
arm_args() {
  case $1 in
    old) echo "--lambda_distill 400" ;;                  # the shipped recipe (per-element-mean λ)
    add) echo "${paper[*]}" ;;                          # full ADD
    distill) echo "${paper[*]} --lambda_adv 0" ;;       # score distillation only
    adv) echo "${paper[*]} --lambda_distill 0" ;;       # adversarial only
    add-v) echo "${paper[*]} --student_prediction v_prediction" ;;
    add-bal) echo "${paper[*]} --lambda_mode adaptive --lambda_distill 1" ;;  # both gradients of one norm
    *) echo "unknown arm $1" >&2; return 1 ;;
  esac
}

for arm in "${arms[@]}"; do
  # shellcheck disable=SC2046
  python3 -m sdxl_fast.distill "${common[@]}" $(arm_args "$arm") $(from "$arm") --output_dir "$work/$arm" \
      --max_minutes "$minutes" >"$work/$arm.log" 2>&1 &
done
wait
for arm in "${arms[@]}"; do cp "$work/$arm/summary.json" "$work/$arm/train-summary.json"; done

# S: the last checkpoint every arm has; each arm is exported from it and from S/2 (rounded to a checkpoint).
last() { ls "$work/$1/checkpoints" | sed 's/checkpoint-0*//' | sort -n | tail -1; }
S=$(for arm in "${arms[@]}"; do last "$arm"; done | sort -n | head -1)
S=$(( S / every * every ))
half=$(( S / 2 / every * every ))
[ "$half" -gt 0 ] || { echo "every arm must reach $((2 * every)) steps; the slowest reached $S" >&2; exit 1; }
echo "equal budget: $S steps per arm (candidates at $half and $S)"
for arm in "${arms[@]}"; do
  for s in "$half" "$S"; do
    ( python3 -m sdxl_fast.distill "${common[@]}" $(arm_args "$arm") $(from "$arm") --output_dir "$work/$arm" \
          --max_minutes 0 --resume "$(printf '%s/%s/checkpoints/checkpoint-%08d' "$work" "$arm" "$s")" \
          --max_steps "$s" --export_continuation "$([ "$s" = "$S" ] && echo true || echo false)" \
          >>"$work/$arm.log" 2>&1 &&
      rm -rf "$work/$arm/export-$s" && mv "$work/$arm/student" "$work/$arm/export-$s" ) &
    wait  # one export per arm at a time: both write WORK/ARM/student
  done &
done
wait
