source .dev/s44/setup.sh
( time python examples/bench_decode.py --new-tokens 256 --sparsities 0.5 --extra-sparsities '' --hf-sparsities '' --sdpa-sparsities '' --no-batch4 --no-dense-combo --no-dense-tuned --weights int8,int4 --weight-sparsities 0,0.4,0.5 --quantize-lm-head --no-weight-baselines --out $OUT/decode_h200_v50.md ) > $OUT/decode_record_h200_v50.log 2>&1
tail -3 $OUT/decode_record_h200_v50.log; grep "lean loop" $OUT/decode_h200_v50.md
( timeout 150 python -m pytest -q -rA tests/test_gpu.py tests/test_qkv_rope_kernel.py -k "folded or llama3_8b_attention_from_sums" ; echo "rc $?" ) > $OUT/gpu_tests_h200_v50.log 2>&1
grep -E "^PASSED|^FAILED|passed|failed|rc " $OUT/gpu_tests_h200_v50.log | tail -40
