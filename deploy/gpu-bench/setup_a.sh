#!/bin/bash
# Device call 1: wheels, redis-server, the converted tokenizer, the bench model folder, GGUF part 1 -> /tmp/kv.
mkdir -p /tmp/kv && cp -r .devcarry/a/* /tmp/kv/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/kv/whl/*.whl
chmod +x /tmp/kv/bin/redis-server
LD_LIBRARY_PATH=/tmp/kv/bin /tmp/kv/bin/redis-server --port 6379 --save '' --appendonly no --daemonize yes --logfile /tmp/kv/redis.log
# A second server with I/O threads (the H200 host has 16 cores; this 2-core machine showed no gain), so
# `bench-store --only redis` can be run against both in one call: --redis-url redis://127.0.0.1:6380/0.
LD_LIBRARY_PATH=/tmp/kv/bin /tmp/kv/bin/redis-server --port 6380 --save '' --appendonly no --daemonize yes \
  --io-threads 4 --io-threads-do-reads yes --logfile /tmp/kv/redis-io4.log
sleep 0.5
python3 -c "import sys; sys.path.insert(0,'/tmp/site'); import redis; print('redis ping', redis.Redis().ping())"
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
