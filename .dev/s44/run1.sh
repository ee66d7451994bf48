source .dev/s44/setup.sh
( time python examples/bench_decode.py --new-tokens 256 --sparsities 0.5 --extra-sparsities '' --hf-sparsities '' --sdpa-sparsities '' --no-batch4 --no-dense-combo --no-dense-tuned --weights int8,int4 --weight-sparsities 0,0.4,0.5 --quantize-lm-head --no-weight-baselines --out $OUT/decode_h200_v50.md ) > $OUT/decode_record_h200_v50.log 2>&1
tail -3 $OUT/decode_record_h200_v50.log; grep "lean loop" $OUT/decode_h200_v50.md
( time timeout 250 python examples/bench_decode.py --new-tokens 256 --sparsities '' --no-dense1 --extra-sparsities '' --hf-sparsities '' --sdpa-sparsities '' --no-batch4 --no-dense-combo --no-dense-tuned --weights int8,int4 --weight-sparsities 0.5 --quantize-lm-head --no-weight-baselines --ab-option fold_qkv_attention --out $OUT/decode_ab_fold_qkv_attention_h200_v50.md ) > $OUT/decode_ab_fold_qkv_attention_h200_v50.log 2>&1
tail -8 $OUT/decode_ab_fold_qkv_attention_h200_v50.log
