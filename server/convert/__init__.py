"""Converters from other checkpoint formats into what adapterd serves: a transformers-native base directory and
PEFT adapter directories. ``chatglm3``: THUDM's ChatGLM3 layout (remote code) into ``GlmForCausalLM``, and its
``finetune_demo`` P-Tuning v2 and LoRA checkpoints into PEFT adapters for that base (``adapterd convert``)."""
