"""The chat templates of the Qwen-VL families, for the tiny tokenizers the project builds itself.

Real checkpoints bring their own template (``chat_template.jinja`` / ``chat_template.json``) and
it is used as is; these strings are used only by :mod:`vlm_grpo_ma.models.tiny`.

- Qwen2-VL and Qwen2.5-VL share one template: a default system turn ("You are a helpful
  assistant.") when the conversation has none, images as
  ``<|vision_start|><|image_pad|><|vision_end|>`` where they appear in the content.
- Qwen3-VL Thinking's generation prompt opens the thought (``<think>\n``):
  :data:`QWEN3_VL_THINKING_CHAT_TEMPLATE`, and :func:`generation_prefix` / :func:`template_kind`
  tell the two kinds apart on any processor or tokenizer.
- Qwen3-VL's template has no default system turn, renders assistant content given as a list of
  text parts, and wraps tool results in ``<tool_response>`` inside a user turn.  The released
  template's tool-calling header and ``tool_calls`` rendering are kept; nothing in this project
  uses them.
"""

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL (Instruct).  Written with ``{%-`` / ``-%}`` whitespace control as the original, so
# the rendered text has no stray newlines.
_QWEN3_VISION_ITEM = (
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}"
    "{%- endif %}"
)

QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}"
    "{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- '\\n\\n' }}"
    "{%- endif %}"
    "{{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
    "{%- else %}"
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}"
    "{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- set image_count = namespace(value=0) %}"
    "{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}" + _QWEN3_VISION_ITEM + "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content_item in message.content %}{%- if 'text' in content_item %}{{- content_item.text }}{%- endif %}{%- endfor %}"
    "{%- endif %}"
    "{%- if message.tool_calls %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if (loop.first and message.content) or (not loop.first) %}{{- '\\n' }}{%- endif %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}" + _QWEN3_VISION_ITEM + "{%- endfor %}"
    "{%- endif %}"
    "{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: family name -> chat template
CHAT_TEMPLATES = {
    "qwen2_vl": QWEN2_VL_CHAT_TEMPLATE,
    "qwen2_5_vl": QWEN2_VL_CHAT_TEMPLATE,
    "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE,
}

# The chat template released with Qwen3-VL-2B-Instruct (``chat_template.json`` of
# Qwen/Qwen3-VL-2B-Instruct on the Hugging Face hub), transcribed from two public copies of that
# file which agree: a raw string, so ``\n`` is the two characters of a Jinja escape as in the
# released file.  Its rendering equals
# QWEN3_VL_CHAT_TEMPLATE's (tests/test_real_vocab.py); real-vocabulary Qwen3-VL tokenizers use
# this one (vlm_grpo_ma.models.real_vocab).
QWEN3_VL_RELEASED_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# The Thinking checkpoints of Qwen3-VL (Qwen/Qwen3-VL-*-Thinking on the Hugging Face hub) open the
# thought in their chat template: the generation prompt is ``<|im_start|>assistant\n<think>\n`` and
# the model writes the thought, ``</think>`` and the answer.  Public notes on those checkpoints say
# so (huggingface/trl issue #6966 "chat template pre-fills <think>", om-ai-lab/VLM-R1 issue #173),
# as do the released Qwen3-4B-Thinking-2507 and QwQ-32B templates, whose last lines are
# ``{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n<think>\n' }}{%- endif %}``.
# No verbatim copy of the Qwen3-VL Thinking ``chat_template.json`` could be found offline: this
# is the released Instruct template above with that generation prompt.  What the project depends on is exactly that
# prompt (single-turn prompts; earlier assistant turns, which the released Thinking template
# renders with their ``reasoning_content``, never occur here).
QWEN3_VL_THINKING_CHAT_TEMPLATE = QWEN3_VL_RELEASED_CHAT_TEMPLATE.replace(
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}",
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n<think>\\n' }}\n{%- endif %}",
)
assert QWEN3_VL_THINKING_CHAT_TEMPLATE != QWEN3_VL_RELEASED_CHAT_TEMPLATE

# ---------------------------------------------------------------------------------------------
# Template kinds: what the generation prompt already wrote of the completion

#: the generation prompt ends with the assistant header: the model writes ``<think>`` itself
PLAIN = "plain"
#: the generation prompt ends with ``<think>`` (Qwen3-VL Thinking, QwQ): the thought is open
THINKING = "thinking"
TEMPLATE_KINDS = (PLAIN, THINKING)

_ASSISTANT_HEADER = "<|im_start|>assistant\n"
_THINK_OPEN = "<think>"
_PROBE = [{"role": "user", "content": [{"type": "text", "text": "probe"}]}]


class UnknownChatTemplate(ValueError):
    """A chat template whose generation prompt the project does not know how to continue."""


def generation_prefix(processor_or_tokenizer) -> str:
    """The part of the completion that the chat template's generation prompt already wrote:
    ``""`` for a plain template (Qwen2-VL, Qwen2.5-VL, Qwen3-VL Instruct) and ``"<think>\\n"``
    (the text exactly as the template writes it) for a thinking one (Qwen3-VL Thinking).

    Rendered from the processor's (or tokenizer's) own chat template on a one-message probe,
    so it holds for any checkpoint, fine-tuned or not.  Every consumer of completions puts this
    prefix in front of what the model generated before the format rule reads it (rollouts,
    evaluation, benchmark), and SFT teaches only what comes after it.

    Raises :class:`UnknownChatTemplate` when there is no chat template, when the generation
    prompt does not end with Qwen's ``<|im_start|>assistant\\n`` header, or when the header is
    followed by anything other than nothing or ``<think>`` (+ whitespace): a clear error at
    start instead of completions that all fail the format rule.
    """
    owner = processor_or_tokenizer
    if getattr(owner, "chat_template", None) is None and getattr(getattr(owner, "tokenizer", None), "chat_template", None) is None:
        raise UnknownChatTemplate(f"{type(owner).__name__} has no chat template: the project needs a Qwen-VL chat template")
    try:
        with_prompt = owner.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
        without = owner.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=False)
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable template
        raise UnknownChatTemplate(f"the chat template of {type(owner).__name__} cannot render a user turn: {e}") from e
    if isinstance(with_prompt, list):  # some processors return one text per conversation
        with_prompt, without = with_prompt[0], without[0]
    if not with_prompt.startswith(without):
        raise UnknownChatTemplate("the chat template's generation prompt rewrites the conversation before it: "
                                  f"{with_prompt[-200:]!r}")
    tail = with_prompt[len(without):]
    if not tail.startswith(_ASSISTANT_HEADER):
        raise UnknownChatTemplate(f"the chat template's generation prompt is {tail!r}, not Qwen's "
                                  f"{_ASSISTANT_HEADER!r} header: not a Qwen-VL chat template")
    prefix = tail[len(_ASSISTANT_HEADER):]
    if prefix and prefix.strip() != _THINK_OPEN:
        raise UnknownChatTemplate(
            f"the chat template's generation prompt continues the assistant turn with {prefix!r}: the project knows "
            f"two template kinds, {PLAIN!r} (nothing after the header) and {THINKING!r} ({_THINK_OPEN!r}, as Qwen3-VL "
            "Thinking); use a checkpoint with one of them or pass a chat template that is one")
    return prefix


def template_kind(processor_or_tokenizer) -> str:
    """:data:`PLAIN` or :data:`THINKING` (see :func:`generation_prefix`, which it calls)."""
    return THINKING if generation_prefix(processor_or_tokenizer) else PLAIN
