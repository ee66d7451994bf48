source .dev/s44/setup.sh
( timeout 200 python -m pytest -q -rA tests/test_gpu.py tests/test_qkv_rope_kernel.py -k "folded or llama3_8b_attention_from_sums" ; echo "rc $?" ) > $OUT/gpu_tests_h200_v50.log 2>&1
tail -25 $OUT/gpu_tests_h200_v50.log | grep -E "PASS|FAIL|passed|failed|rc "
( timeout 100 python examples/bench_kernels.py --no-bf16 --weights int8,int4 --block-mlp ) > $OUT/block_mlp_fold_h200_v50.log 2>&1; tail -25 $OUT/block_mlp_fold_h200_v50.log
( timeout 120 python -m pytest -q tests/test_qkv_rope_kernel.py -k "attention_from_sums_matches" ; echo "rc $?" ) > $OUT/gpu_tests_hyp_h200_v50.log 2>&1; tail -3 $OUT/gpu_tests_hyp_h200_v50.log
