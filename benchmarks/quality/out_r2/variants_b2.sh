while kill -0  2>/dev/null; do sleep 3; done
/work/venv/bin/python benchmarks/quality/run.py --steps 200 --batch-size 64 --optimizer adamw --lr 4e-4 --keep-ratio 0.8 --keep-eos --out benchmarks/quality/out_r2/var_k08 --seeds 2 --methods at_full_val_kfac,at_stab_kfac
/work/venv/bin/python benchmarks/quality/run.py --steps 200 --batch-size 64 --optimizer adamw --lr 4e-4 --keep-ratio 0.8 --keep-eos --out benchmarks/quality/out_r2/var_k08 --seeds 0 1 2 --methods at_full_batch_kfac
