"""The built-in demo model and tokenizer: tiny, deterministic, random, and never downloaded.

`--model demo` on the tokenizer and engine services selects them, so that `kvmesh up` answers on a
fresh machine with nothing fetched. The two tiers must agree on the vocabulary, hence one module.
The demo model's weights are random (seeded): its text is noise, and the CLI says so.
"""

DEMO_MODEL_NAME = "kvmesh-demo"
DEMO_UNK_ID = 0
DEMO_BOS_ID = 1
DEMO_EOS_ID = 2
DEMO_BYTE_OFFSET = 3  # ids 3..258 are the byte tokens <0x00>..<0xFF> (byte fallback)
DEMO_VOCAB_SIZE = 259
DEMO_MAX_MODEL_LEN = 2048
DEMO_SEED = 1234

# A Llama-shaped config small enough to run anywhere (dict in HF config.json form).
DEMO_MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": DEMO_VOCAB_SIZE,
    "max_position_embeddings": DEMO_MAX_MODEL_LEN,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "bos_token_id": DEMO_BOS_ID,
    "eos_token_id": DEMO_EOS_ID,
    "torch_dtype": "float32",
}
