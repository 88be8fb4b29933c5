"""What a server reads from a model directory beside the weights: the chat template, the generation settings, every
EOS id and the context length.

One record carries them from the source model to every export: ``read_source_record`` takes it from a Hugging Face
directory on import (and when training starts from one), the checkpoint record keeps it (``CheckpointMeta.hf``,
copied into the run dir of every run initialised from that checkpoint), and the exports write it back
(``export_fields``). Keys: ``bos_token_id``, ``eos_token_id`` (an id or a list, as recorded),
``max_position_embeddings``, ``generation_config`` (the source's ``generation_config.json``, whole) and
``chat_template`` (a string, or transformers' list of named templates).

The chat template is parsed with jinja2 on the way in, the way transformers compiles it (sandboxed environment,
``loopcontrols``), so a template the server could not compile is refused with one line at import or export,
not at the first chat request. jinja2 is a runtime requirement for that reason: with the check only where jinja2
happens to be installed, the same input would be accepted on one machine and refused on another.
"""

from __future__ import annotations

import os

from tidar_jax.hf.keys import HFFormatError
from tidar_jax.hf.load import GENERATION_CONFIG_FILE, read_json, token_ids

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' own file for it; wins over tokenizer_config.json


def check_chat_template(template, where: str) -> None:
    """Raise ``HFFormatError`` (one line naming ``where``) unless ``template`` (a string or a list of
    ``{"name", "template"}``) parses as Jinja."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if isinstance(template, list):
        if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
            raise HFFormatError(f"{where}: chat_template list must hold {{'name', 'template'}} objects")
        for t in template:
            check_chat_template(t["template"], f"{where} ({t.get('name')!r})")
        return
    if not isinstance(template, str):
        raise HFFormatError(f"{where}: chat_template must be a string, got {type(template).__name__}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    try:
        env.parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise HFFormatError(f"{where}: the chat template does not parse as Jinja: {e.message} (template line "
                            f"{e.lineno})") from None


def read_chat_template(hf_dir: str):
    """The chat template of an HF directory (``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template``), checked; None when it has none."""
    jinja_path = os.path.join(hf_dir, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
        check_chat_template(template, jinja_path)
        return template
    tc_path = os.path.join(hf_dir, TOKENIZER_CONFIG_FILE)
    template = read_json(tc_path).get("chat_template") if os.path.isfile(tc_path) else None
    if template is not None:
        check_chat_template(template, tc_path)
    return template


def read_generation_config(path: str) -> dict:
    """A ``generation_config.json`` file, checked to be a JSON object with integer token ids."""
    gen = read_json(path)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = gen.get(key)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise HFFormatError(f"{path}: {key}={value!r}: expected a token id or a list of token ids")
    return gen


def read_source_record(hf_dir: str, hf_config: dict) -> dict:
    """The serving record of a source HF directory (``hf_config``: its parsed ``config.json``)."""
    gen_path = os.path.join(hf_dir, GENERATION_CONFIG_FILE)
    return {**token_ids(hf_dir, hf_config),
            "max_position_embeddings": hf_config.get("max_position_embeddings"),
            "generation_config": read_generation_config(gen_path) if os.path.isfile(gen_path) else None,
            "chat_template": read_chat_template(hf_dir)}


def with_overrides(record: dict | None, generation_config: str | None = None,
                   chat_template: str | None = None) -> dict:
    """``record`` with the export's explicit files in place of the recorded ones (a ``generation_config.json`` path,
    a Jinja template file path), each checked."""
    out = dict(record or {})
    if generation_config is not None:
        if not os.path.isfile(generation_config):
            raise HFFormatError(f"--generation-config {generation_config}: no such file")
        out["generation_config"] = read_generation_config(generation_config)
    if chat_template is not None:
        if not os.path.isfile(chat_template):
            raise HFFormatError(f"--chat-template {chat_template}: no such file")
        with open(chat_template, encoding="utf-8") as f:
            out["chat_template"] = f.read()
        check_chat_template(out["chat_template"], chat_template)
    return out


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def eos_ids(record: dict | None, checkpoint_eos) -> list[int]:
    """Every EOS id an export lists: the source's (its generation config's, else the recorded ones), then the
    checkpoint's own (the data's end-of-document id a run trained with) where not already listed."""
    record = record or {}
    gen = record.get("generation_config") or {}
    out = _ids(gen.get("eos_token_id", record.get("eos_token_id")))
    for i in _ids(checkpoint_eos):
        if i not in out:
            out.append(i)
    return out


def export_fields(record: dict | None, checkpoint_eos) -> dict:
    """Keyword arguments of ``tidar_jax.hf.export_hf`` that carry the record into an export."""
    record = record or {}
    eos = eos_ids(record, checkpoint_eos)
    gen = record.get("generation_config") or {}
    bos = gen.get("bos_token_id", record.get("bos_token_id"))
    return {"eos_token_id": None if not eos else eos[0] if len(eos) == 1 else eos, "bos_token_id": bos,
            "max_position_embeddings": record.get("max_position_embeddings"),
            "generation_config": record.get("generation_config"), "chat_template": record.get("chat_template")}
