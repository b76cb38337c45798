set -x
while kill -0 25083 2>/dev/null; do sleep 5; done
P=/work/venv/bin/python
for lr in 1e-4 2e-4 3e-4; do $P benchmarks/quality/run.py --steps 200 --batch-size 64 --optimizer adamw --lr $lr --keep-ratio 0.6 --seeds 0 1 2 --out benchmarks/quality/out_r2/var --methods full --suffix _lr$lr; done
$P benchmarks/quality/run.py --steps 200 --batch-size 64 --optimizer adamw --lr 4e-4 --keep-ratio 0.8 --keep-eos --seeds 0 1 --out benchmarks/quality/out_r2/var_k08 --methods random,rho1,entropy,at_full_val_kfac,at_stab_kfac,at_adapt_val
