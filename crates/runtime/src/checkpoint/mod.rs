//! A checkpoint folder: config.json and single or sharded safetensors, memory-mapped.
