set -x
P=/work/venv/bin/python
$P benchmarks/quality/run.py --steps 200 --batch-size 64 --lr 4e-4 --optimizer adamw --keep-ratio 0.6 --keep-eos --seeds 0 1 2 --out benchmarks/quality/out_r2/var --methods at_adapt_val
$P benchmarks/quality/run.py --steps 200 --batch-size 64 --lr 4e-4 --optimizer adamw --keep-ratio 0.6 --seeds 0 1 2 --out benchmarks/quality/out_r2/var --methods at_full_val_kfac --suffix _eos_maskable
$P benchmarks/quality/run.py --steps 200 --batch-size 64 --lr 4e-4 --optimizer adamw --keep-ratio 0.6 --keep-eos --seeds 0 1 --out benchmarks/quality/out_r2/var --methods at_full_val_kfac --set stability_weight=0.3 --suffix _lam0.3
$P benchmarks/quality/run.py --steps 200 --batch-size 64 --lr 4e-4 --optimizer adamw --keep-ratio 0.6 --keep-eos --seeds 0 1 --out benchmarks/quality/out_r2/var --methods at_full_val_kfac --set stability_weight=3.0 --suffix _lam3
$P benchmarks/quality/run.py --steps 200 --batch-size 64 --lr 4e-4 --optimizer adamw --keep-ratio 0.6 --keep-eos --seeds 0 1 --out benchmarks/quality/out_r2/var --methods at_full_val_kfac_raw
$P benchmarks/quality/run.py --steps 200 --batch-size 64 --lr 4e-4 --optimizer adamw --keep-ratio 0.6 --keep-eos --seeds 0 1 --out benchmarks/quality/out_r2/var --methods at_full_val_kfac --set tracked_layers=1 --suffix _last1
