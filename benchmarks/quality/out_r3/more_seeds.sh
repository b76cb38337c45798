# Round 3: seeds 3 4 5 for the keep-0.8 lead (AlphaToken-val and Rho-1 above the full-SFT lr curve) and for the curve itself.
set -x
P=${P:-python}
$P benchmarks/quality/run.py --steps 200 --batch-size 64 --optimizer adamw --lr 4e-4 --keep-ratio 0.8 --keep-eos --seeds 3 4 5 --out benchmarks/quality/out_r3/k08 --methods at_full_val_kfac,rho1,random,at_adapt_val
$P benchmarks/quality/run.py --steps 200 --batch-size 64 --optimizer adamw --lr 4e-4 --keep-ratio 0.6 --seeds 3 4 5 --out benchmarks/quality/out_r3/curve --methods full
for lr in 1e-4 2e-4 3e-4; do $P benchmarks/quality/run.py --steps 200 --batch-size 64 --optimizer adamw --lr $lr --keep-ratio 0.6 --seeds 3 4 5 --out benchmarks/quality/out_r3/curve --methods full --suffix _lr$lr; done
