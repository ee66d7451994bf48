source .dev/s44/setup.sh
( timeout 170 python -m pytest -q -rA tests/test_gpu.py tests/test_qkv_rope_kernel.py -k "folded or llama3_8b_attention_from_sums" ; echo "rc $?" ) > $OUT/gpu_tests_h100_v50.log 2>&1
grep -E "^PASSED|^FAILED|passed|failed|rc " $OUT/gpu_tests_h100_v50.log | tail -30
( time timeout 330 python examples/bench_decode.py --new-tokens 256 --sparsities '' --no-dense1 --extra-sparsities '' --hf-sparsities '' --sdpa-sparsities '' --no-batch4 --no-dense-combo --no-dense-tuned --weights int4,int8 --weight-sparsities 0.5 --quantize-lm-head --no-weight-baselines --ab-option fold_qkv_attention --out $OUT/decode_ab_fold_qkv_attention_h100_v50.md ) > $OUT/decode_ab_fold_qkv_attention_h100_v50.log 2>&1
grep -E "^\('lean|real" $OUT/decode_ab_fold_qkv_attention_h100_v50.log
( timeout 80 python examples/bench_kernels.py --no-bf16 --weights int8,int4 --block-mlp ) > $OUT/block_mlp_h100_v50.log 2>&1; tail -12 $OUT/block_mlp_h100_v50.log
