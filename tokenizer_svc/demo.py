"""The built-in `demo` tokenizer: UTF-8 bytes as tokens, built in code, nothing downloaded.

Vocabulary (fixed by kvmesh.demo, shared with the engine's demo model): 0 <unk>, 1 <s> (BOS),
2 </s> (EOS), 3..258 the byte tokens <0x00>..<0xFF>. It is a byte-fallback BPE with no merges and
no other pieces, so every character becomes its UTF-8 bytes; BOS is prepended, as for Llama.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, processors

from kvmesh.demo import DEMO_BOS_ID, DEMO_BYTE_OFFSET, DEMO_EOS_ID, DEMO_UNK_ID, DEMO_VOCAB_SIZE

UNK, BOS, EOS = "<unk>", "<s>", "</s>"

# A plain-text chat template (the vocabulary has no chat tokens), so that chat requests work end
# to end against the demo model; its output is noise either way.
DEMO_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_demo_tokenizer() -> Tokenizer:
    """The demo tokenizer, identical on every machine."""
    vocab = {UNK: DEMO_UNK_ID, BOS: DEMO_BOS_ID, EOS: DEMO_EOS_ID}
    vocab.update({f"<0x{b:02X}>": DEMO_BYTE_OFFSET + b for b in range(256)})
    assert len(vocab) == DEMO_VOCAB_SIZE
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, byte_fallback=True))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (UNK, BOS, EOS)])
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, DEMO_BOS_ID)])
    return tokenizer
