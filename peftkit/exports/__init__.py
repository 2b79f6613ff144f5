"""`peftkit export RUN --format gguf|onnx`: a finished run's merged model in a format people deploy. One file per
format; `common.py` holds what they share (the merged model, dependency checks, the verification prompts)."""
