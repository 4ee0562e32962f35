#!/bin/bash
# Submit Figure 2 as a Slurm job array, one task per run, and the figure step after it.
#   bash docs/slurm/submit.sh cpu --out-dir fig2 --data-dir data [any other flags]
#   bash docs/slurm/submit.sh gpu --out-dir fig2 --data-dir data --seeds 10
# Run it from the folder that holds reproduce_fig2.py; every task gets the same flags.
set -euo pipefail
kind=$1
shift
runs=$(python reproduce_fig2.py --list-runs "$@" | wc -l)
array=$(sbatch --parsable --array="0-$((runs - 1))" "docs/slurm/fig2_$kind.sbatch" "$@")
plot=$(sbatch --parsable --dependency="afterany:$array" --job-name=fig2-plot \
    --output=fig2_plot_%j.log --wrap "python reproduce_fig2.py --plot-only $*")
echo "array job $array ($runs runs), figure job $plot"
