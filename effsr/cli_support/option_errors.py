"""Readable option errors: jsonargparse's messages rewritten to name the option, the command and the closest valid
names."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re

_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_CLASS_PATH = re.compile(r"Problem with given class_path '([^']+)'")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_UNKNOWN_OPTION = re.compile(r"does not accept option '([^']+)'|unrecognized arguments: --?([^\s=]+)")


def accepted_parameters(cls: type) -> list[str]:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` to the parent classes."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())
        names += [p.name for p in parameters if p.name != "self" and p.name not in names
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def import_class(class_path: str) -> type | None:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _suggest(name: str, valid: list[str], prefix: str = "") -> str:
    """'did you mean X?' with the closest valid names (difflib), or the valid names when none is close."""
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    if close:
        return f"did you mean {' or '.join(prefix + item for item in close)}?"
    return f"valid: {', '.join(prefix + item for item in valid)}" if 0 < len(valid) <= 30 else ""


def option_error_message(message: str, subcommand: str | None, option_names: list[str]) -> str:
    """One readable line for a jsonargparse error: the option's full name and the closest valid names.

    ``option_names``: every option of the (sub)command's parser (for trainer/data typos). Other errors (a bad
    value, a missing file) keep jsonargparse's text, without the usage that used to precede it.
    """
    command = f"effsr {subcommand}" if subcommand else "effsr"
    not_accepted = _NOT_ACCEPTED.search(message)
    if not_accepted:
        path: list[str] = []
        class_path = None
        for line in message.splitlines():
            key, klass = _PARSER_KEY.search(line), _CLASS_PATH.search(line)
            if key:
                path.append(key.group(1))
            if klass:
                class_path = klass.group(1)
                path.append("init_args")
            if _NOT_ACCEPTED.search(line):
                break
        name = not_accepted.group(1)
        cls = import_class(class_path) if class_path else None
        valid = accepted_parameters(cls) if cls else []
        prefix = ".".join(path)
        full = f"{prefix}.{name}" if prefix else name
        suggestion = _suggest(name, valid, f"{prefix}." if prefix else "")
        owner = class_path or "this command"
        helper = f"`{command} --{'.'.join(path[:-1])}.help {class_path}`" if class_path else f"`{command} --help`"
        suggestion = f"{suggestion} " if suggestion else ""
        return f"option {full} is not accepted by {owner}; {suggestion}(all options: {helper})"
    unknown = _UNKNOWN_OPTION.search(message)
    if unknown:
        full = unknown.group(1) or unknown.group(2)
        suggestion = _suggest(full, option_names)
        return f"option {full} is not accepted by `{command}`; {suggestion or f'see `{command} --help`'}"
    return message.strip()
