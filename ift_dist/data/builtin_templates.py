"""The built-in chat templates: one TemplateSpec per built-in member of config.Template, each with its primary source
and the exact text it renders.

These are templates for models that have none of their own (base models). Strings are as the model families define
them; multi-turn follows the same pattern turn after turn. Where the source ends a reply with no token of its own,
"{eos_token}" closes it, so a trained model stops. In the renderings below <s> and </s> stand for the tokenizer's
bos_token and eos_token.
"""

from __future__ import annotations

from ift_dist.config import TemplateSpec

# Stanford Alpaca's two prompt preambles (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
# FastChat's "vicuna_v1.1" conversation template (lm-sys/FastChat, fastchat/conversation.py).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# Meta's Llama-2-chat system prompt (meta-llama/llama, example_chat_completion.py; the DEFAULT_SYSTEM_PROMPT of
# llama/generation.py until commit a971c41). Meta stopped applying it by default on 2023-08-04 (UPDATES.md, "System
# Prompt Update": it caused false refusals) and transformers followed (use_default_system_prompt=False,
# huggingface/transformers#26765), so "llama2" has no default and "llama2_default_system" opts in. The first release
# had two spaces after "while being safe." (removed the next day, commit 6c7fe27); transformers kept that copy.
LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information."
)
# Guanaco's prompt (artidoro/qlora, examples/guanaco_generate.py and the prompts of eval/generations).
GUANACO_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
# Stable Beluga's system prompt (huggingface.co/stabilityai/StableBeluga2 model card, "Usage").
STABLEBELUGA_SYSTEM = (
    "You are Stable Beluga, an AI that follows instructions extremely well. Help as much as you can. "
    "Remember, be safe, and don't do anything illegal."
)
# YAYI's system prompt (wenge-research/YAYI, training/consts.py INTRO, also in the README's inference example). The
# Llama-2-based YAYI checkpoints' model cards give a longer one, adapted from Llama-2's.
YAYI_SYSTEM = (
    "A chat between a human and an AI assistant named YaYi.\n"
    "YaYi is a helpful and harmless language model developed by Beijing Wenge Technology Co.,Ltd."
)


def _alpaca(default_system: str = "", default_system_with_input: str | None = None) -> TemplateSpec:
    """Stanford Alpaca's prompt with the given preambles ("" = none): the reply follows "### Response:" directly, as
    in their training strings (Alpaca-LoRA and LLaMA-Factory add a newline there)."""
    return TemplateSpec(
        prefix="{bos_token}",
        system="{content}\n\n",
        default_system=default_system,
        default_system_with_input=default_system_with_input,
        user="### Instruction:\n{content}\n\n### Response:",
        user_with_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
        assistant_suffix="{eos_token}",
        separator="\n\n",
        tool="### Observation:\n{content}\n\n### Response:",
    )


def _llama2(default_system: str = "") -> TemplateSpec:
    """Llama-2-chat (meta-llama/llama, llama/generation.py chat_completion): the system prompt is folded into the
    first user turn, every exchange opens with BOS."""
    return TemplateSpec(
        default_system=default_system,
        user="{bos_token}[INST] {content} [/INST]",
        system_in_first_user="{bos_token}[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]",
        assistant=" {content} ",
        assistant_suffix="{eos_token}",
        tool="{bos_token}[INST] {content} [/INST]",
    )


BUILTIN_TEMPLATES: dict[str, TemplateSpec] = {
    # tatsu-lab/stanford_alpaca train.py PROMPT_DICT:
    # "<s>{preamble}\n\n### Instruction:\n{user}\n\n[### Input:\n{input}\n\n]### Response:{reply}</s>\n\n".
    "alpaca": _alpaca(ALPACA_SYSTEM, ALPACA_SYSTEM_WITH_INPUT),
    # The same without the preamble (a system message, when there is one, takes its place):
    # "<s>### Instruction:\n{user}\n\n[### Input:\n{input}\n\n]### Response:{reply}</s>\n\n".
    "alpaca_no_preamble": _alpaca(),
    # "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {reply} </s><s>[INST] {user} [/INST] {reply} </s>";
    # no system block unless the conversation (or data.system_prompt) has one.
    "llama2": _llama2(),
    # The same with Meta's system prompt (LLAMA2_SYSTEM) in every conversation that has none.
    "llama2_default_system": _llama2(LLAMA2_SYSTEM),
    # ChatML (OpenAI, Qwen, Hermes, SmolLM): "<|im_start|>{role}\n{content}<|im_end|>\n".
    "chatml": TemplateSpec(
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>",
        separator="\n",
        tool="<|im_start|>tool\n{content}<|im_end|>\n",
    ),
    # Llama 3 / 3.1 instruct: "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>".
    "llama3": TemplateSpec(
        prefix="{bos_token}",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_suffix="<|eot_id|>",
        tool="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>",
        tool_call='{{"name": "{name}", "parameters": {arguments}}}',
    ),
    # Phi-3 instruct: "<|user|>\n{content}<|end|>\n<|assistant|>\n{reply}<|end|>\n".
    "phi3": TemplateSpec(
        prefix="{bos_token}",
        system="<|system|>\n{content}<|end|>\n",
        user="<|user|>\n{content}<|end|>\n",
        assistant_prefix="<|assistant|>\n",
        assistant_suffix="<|end|>",
        separator="\n",
        tool="<|user|>\n{content}<|end|>\n",
    ),
    # Vicuna v1.1 (FastChat "vicuna_v1.1"): "<s>{system} USER: {user} ASSISTANT: {reply}</s>USER: ...".
    "vicuna": TemplateSpec(
        prefix="{bos_token}",
        system="{content} ",
        default_system=VICUNA_SYSTEM,
        user="USER: {content} ",
        assistant_prefix="ASSISTANT:",
        assistant=" {content}",
        assistant_suffix="{eos_token}",
        tool="USER: {content} ",
    ),
    # Stable Beluga (Orca style), as the model card's "Prompt Format" block lays it out (its code example writes
    # "### User: {message}" on one line instead):
    # "<s>### System:\n{system}\n\n### User:\n{user}\n\n### Assistant:\n{reply}</s>\n\n".
    "stablebeluga": TemplateSpec(
        prefix="{bos_token}",
        system="### System:\n{content}\n\n",
        default_system=STABLEBELUGA_SYSTEM,
        user="### User:\n{content}\n\n",
        assistant_prefix="### Assistant:\n",
        assistant_suffix="{eos_token}",
        separator="\n\n",
        tool="### User:\n{content}\n\n",
    ),
    # Guanaco (QLoRA on OpenAssistant, artidoro/qlora examples/guanaco_generate.py):
    # "<s>{system} ### Human: {user} ### Assistant: {reply}</s>### Human: ...".
    "guanaco": TemplateSpec(
        prefix="{bos_token}",
        system="{content} ",
        default_system=GUANACO_SYSTEM,
        user="### Human: {content} ",
        assistant_prefix="### Assistant:",
        assistant=" {content}",
        assistant_suffix="{eos_token}",
        tool="### Human: {content} ",
    ),
    # Firefly (yangjianxin1/Firefly at commit 6554f61: the README's data-format section, component/dataset.py
    # SFTDataset): "<s>{user}</s>{reply}</s>{user}</s>{reply}</s>", each reply and its </s> supervised. The format
    # has no system slot; a system message is one more segment closed by </s>: "<s>{system}</s>{user}</s>...".
    "firefly": TemplateSpec(
        prefix="{bos_token}",
        system="{content}{eos_token}",
        user="{content}{eos_token}",
        assistant_suffix="{eos_token}",
        tool="{content}{eos_token}",
    ),
    # YAYI (wenge-research/YAYI, training/trainer_multi_rounds.py and training/consts.py):
    # "<|System|>:\n{system}\n\n<|Human|>:\n{user}\n\n<|YaYi|>:\n{reply}\n\n<|End|><|Human|>:\n...". YAYI adds the
    # four tags as special tokens (load_tokenizer) and stops on <|End|>; a tokenizer without them must be given them.
    "yayi": TemplateSpec(
        system="<|System|>:\n{content}\n\n",
        default_system=YAYI_SYSTEM,
        user="<|Human|>:\n{content}\n\n",
        assistant_prefix="<|YaYi|>:\n",
        assistant="{content}\n\n",
        assistant_suffix="<|End|>",
        tool="<|Human|>:\n{content}\n\n",
    ),
    # Nous-Hermes (huggingface.co/NousResearch/Nous-Hermes-13b and Nous-Hermes-Llama2-13b model cards, "Prompt
    # Format"): Alpaca without the preamble and with a newline before the reply:
    # "<s>### Instruction:\n{user}\n\n[### Input:\n{input}\n\n]### Response:\n{reply}</s>\n\n".
    "hermes": TemplateSpec(
        prefix="{bos_token}",
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n### Response:\n",
        user_with_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        assistant_suffix="{eos_token}",
        separator="\n\n",
        tool="### Observation:\n{content}\n\n### Response:\n",
    ),
    # Linly ChatFlow (CVI-SZU/Linly points to ProjectD-AI/llama_inference for use; llama_dialogue.py builds
    # "User: {user}\nBot: {reply}\n" per turn after BOS and stops on "User:"). Here </s> closes each reply:
    # "<s>User: {user}\nBot: {reply}</s>\nUser: ...". The prompt ends in "Bot:" and the reply carries its leading
    # space, as in vicuna, so the text is the source's and no token spans prompt and reply. A system message takes
    # the "System: " line of the GuanacoDataset records Linly trained on (CVI-SZU/Linly instructions/README.md).
    "linly": TemplateSpec(
        prefix="{bos_token}",
        system="System: {content}\n",
        user="User: {content}\n",
        assistant_prefix="Bot:",
        assistant=" {content}",
        assistant_suffix="{eos_token}",
        separator="\n",
        tool="User: {content}\n",
    ),
}
