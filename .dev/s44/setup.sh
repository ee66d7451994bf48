top=$(mktemp -d); cp -r teal_fx tests examples pyproject.toml $top/; cp -r passes $top/teal_fx/passes; cp -r kernels $top/teal_fx/kernels
cd $top; export PYTHONPATH=$top; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
