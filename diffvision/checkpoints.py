""" Safe checkpoint reading, shared by the models, DIFF-DiT and the Lightning modules.

Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors only: a pickle that would
import or call anything beyond tensors and plain containers is refused, never run. When a load fails,
``checkpoint_error`` says which file and why: truncated (cut short by a crash or an interrupted
download), corrupt, or refused as unsafe.

torch.load does not check the CRC-32 that torch.save writes for every member of its zip container, so
a bit-flipped checkpoint would load silently with wrong values: ``verify_checkpoint_file`` checks them
first (zipfile reads each member once and compares its CRC; about 11 ms for a 30 MB file in the page
cache, a fraction of the load itself). ``load_checkpoint_file``, the LightningModules'
``load_from_checkpoint`` and the CLI's checkpoint reads all verify.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional, Union

import torch

__all__ = [
    'CorruptCheckpointError',
    'UnsafeCheckpointError',
    'WeightMapping',
    'checkpoint_error',
    'checkpoint_errors',
    'diagnose_checkpoint_file',
    'load_checkpoint_file',
    'model_state_dict',
    'verify_checkpoint_file',
]

PathLike = Union[str, os.PathLike]


class CorruptCheckpointError(OSError):
    """A checkpoint file that is truncated, corrupt or not a checkpoint at all."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A pickle that would import or call code beyond tensors and plain containers: refused."""


# ------------------------------------------------------------------------------------------------
# What is wrong with a file
# ------------------------------------------------------------------------------------------------

def _is_safetensors(path: Path, head: bytes, size: int) -> bool:
    if path.suffix == '.safetensors':
        return True
    # 8-byte little-endian header length, then the JSON header
    return len(head) >= 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < size


def _safetensors_problem(path: Path, size: int) -> Optional[str]:
    with open(path, 'rb') as f:
        header_len = int.from_bytes(f.read(8), 'little')
        if size < 8 + header_len:
            return (f"truncated: its safetensors header announces {header_len} bytes but the file has "
                    f"{size} bytes in all")
        try:
            header = json.loads(f.read(header_len))
            ends = [int(v['data_offsets'][1]) for k, v in header.items() if k != '__metadata__']
        except (ValueError, KeyError, TypeError, IndexError) as err:
            return f"corrupt: its safetensors header is not valid ({type(err).__name__}: {err})"
    need = 8 + header_len + max(ends, default=0)
    if size < need:
        return f"truncated: its tensors need {need} bytes, the file has {size}"
    return None


def _zip_problem(path: Path, size: int) -> Optional[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        return (f"truncated or corrupt: torch.save's zip container is incomplete ({err}; {size} bytes "
                f"on disk)")
    if bad is not None:
        return f"corrupt: the archive member {bad!r} fails its CRC check"
    return None


def diagnose_checkpoint_file(path: PathLike) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint file, or ``None`` when its container looks intact.

    Checks torch.save's zip format (``.pt/.pth/.bin/.ckpt``) member by member and a safetensors
    file's header against its size; an old-style (non-zip) torch pickle cannot be checked this way.
    """
    path = Path(path)
    if not path.exists():
        return 'it does not exist'
    if not path.is_file():
        return 'it is not a file'
    size = path.stat().st_size
    if size == 0:
        return 'the file is empty (0 bytes): truncated'
    with open(path, 'rb') as f:
        head = f.read(9)
    if head[:4] == b'PK\x03\x04':
        return _zip_problem(path, size)
    if _is_safetensors(path, head, size):
        return _safetensors_problem(path, size)
    if head[:1] == b'\x80':  # a pickle (protocol >= 2): torch's legacy format or a bare pickle
        return None
    if head.startswith(b'version https://git-lfs'):
        return 'it is a git-lfs pointer, not the weights (run `git lfs pull`)'
    return 'not a checkpoint: neither torch.save\'s zip format, safetensors nor a pickle'


# ------------------------------------------------------------------------------------------------
# Turning a library's load error into one that names the file and the reason
# ------------------------------------------------------------------------------------------------

def _chain(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _refused_globals(path: Path, err: BaseException) -> Optional[List[str]]:
    """The globals a weights-only load refused, or None when ``err`` is no such refusal."""
    refusals = []
    for e in _chain(err):
        text = str(e)
        if isinstance(e, UnsafeCheckpointError):
            return None  # already explained
        if ('Weights only load failed' in text or 'weights_only=True blocked' in text
                or 'Unsupported global' in text or 'unrecognized function' in text):
            refusals.append(text)
    if not refusals:
        return None
    found = [g for text in refusals for g in re.findall(r'GLOBAL ([\w.]+)', text)]
    found += [g for text in refusals for g in re.findall(r'unrecognized function (\S+)', text)]
    if not found:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - only an explanation; the refusal stands either way
            found = _pickle_globals(path)
    return sorted(set(found)) or ['(unknown)']


def _pickle_globals(path: Path) -> List[str]:
    """The non-allowlisted globals a (legacy torch or bare) pickle names, read statically with
    pickletools: nothing is imported or run. Best effort: an explanation, not a safety check."""
    import pickletools

    found: List[str] = []
    with open(path, 'rb') as f:
        for _ in range(8):  # torch's legacy format is a few pickles in a row, then raw storages
            strings: List[Any] = []
            memo: dict = {}
            ops = 0
            try:
                for op, arg, _ in pickletools.genops(f):
                    ops += 1
                    if op.name in ('GLOBAL', 'INST'):
                        found.append(str(arg).replace(' ', '.'))
                    elif op.name == 'STACK_GLOBAL' and len(strings) >= 2:
                        found.append(f'{strings[-2]}.{strings[-1]}')
                    elif op.name == 'MEMOIZE' and strings:
                        memo[len(memo)] = strings[-1]
                    elif op.name in ('BINPUT', 'LONG_BINPUT', 'PUT') and strings:
                        memo[arg] = strings[-1]
                    elif op.name in ('BINGET', 'LONG_BINGET', 'GET') and arg in memo:
                        strings.append(memo[arg])
                    elif isinstance(arg, str):
                        strings.append(arg)
            except Exception:  # noqa: BLE001 - past the pickles (legacy storages) or corrupt
                break
            if ops == 0:
                break
    return [g for g in found if not _plain_weights_global(g)]


# What a plain tensor pickle names (torch's storages, rebuild functions, dtypes and containers), spelled
# out here because torch publishes no list of its weights-only allowlist.
_PLAIN_GLOBALS = re.compile(r'torch\._utils\._rebuild_\w+|torch\.\w*Storage|torch\.(Size|device|dtype|\w*float\w*|'
                            r'\w*int\d*|bool|complex\w*)|collections\.OrderedDict|builtins\.(set|frozenset|bytearray)')


def _plain_weights_global(name: str) -> bool:
    return _PLAIN_GLOBALS.fullmatch(name) is not None or any(
        name == f'{g.__module__}.{g.__qualname__}' for g in torch.serialization.get_safe_globals()
        if hasattr(g, '__qualname__'))


def checkpoint_error(path: PathLike, err: BaseException) -> Optional[Exception]:
    """An error naming ``path`` and what is wrong with it, for a failed load; ``None`` when the file
    is fine (the failure is elsewhere and ``err`` should propagate as it is)."""
    path = Path(path)
    # A damaged or foreign file first: torch's weights-only unpickler reports random bytes as a refused
    # pickle, which would read as "this file carries code" when it is just not a checkpoint.
    problem = diagnose_checkpoint_file(path) if path.exists() else None
    refused = _refused_globals(path, err) if problem is None else None
    if refused is not None and refused != ['(unknown)']:
        return UnsafeCheckpointError(
            f"refused to load {path}: it is not a plain weights file; unpickling it would import or call "
            f"{', '.join(refused)}. diffvision reads checkpoints with torch.load(weights_only=True) or "
            f"safetensors and never runs code from a checkpoint. If you made this file yourself, re-save "
            f"its tensors (a state dict) or convert it to safetensors.")
    if refused is not None:  # refused, yet it names nothing to import: the pickle stream itself is bad
        reason = next((line.strip() for e in _chain(err) for line in str(e).splitlines()
                       if line.startswith('Unsupported operand')), 'no global named')
        problem = f"corrupt: its pickle stream is not readable ({reason})"
    if problem is None and any(isinstance(e, EOFError) or 'Ran out of input' in str(e) for e in _chain(err)):
        problem = 'truncated: the pickle ends early'
    if problem is None:
        return None
    return CorruptCheckpointError(f"cannot load checkpoint {path}: {problem}. Re-save or re-download it.")


def verify_checkpoint_file(path: PathLike) -> None:
    """Raise ``CorruptCheckpointError`` naming ``path`` when its container is damaged: a torch.save zip
    member whose CRC-32 does not match (a flipped bit), a truncated zip or safetensors file, an empty
    or foreign file. Plain and legacy pickles carry no checksum and pass."""
    problem = diagnose_checkpoint_file(path)
    if problem is not None:
        raise CorruptCheckpointError(f"cannot load checkpoint {path}: {problem}. Re-save or re-download it.")


@contextlib.contextmanager
def checkpoint_errors(*paths: PathLike) -> Iterator[None]:
    """Re-raise a load failure from timm / diffusers / Lightning as ``checkpoint_error`` of the first
    broken file among ``paths`` (local files; others are skipped); other errors pass unchanged."""
    try:
        yield
    except (CorruptCheckpointError, UnsafeCheckpointError):
        raise
    except Exception as err:
        for path in paths:
            if path is None or not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
                continue
            translated = checkpoint_error(path, err)
            if translated is not None:
                raise translated from err
        raise


def load_checkpoint_file(path: PathLike, map_location: Any = 'cpu', mmap: bool = False) -> Any:
    """Read a checkpoint safely: safetensors, or ``torch.load(weights_only=True)``.

    Raises ``FileNotFoundError``, ``UnsafeCheckpointError`` (a pickle with code or unknown globals)
    or ``CorruptCheckpointError`` (truncated / corrupt, including a zip member failing its CRC check:
    ``verify_checkpoint_file``), each naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" if not path.exists()
                                else f"checkpoint {path} is not a file")
    verify_checkpoint_file(path)
    with checkpoint_errors(path):
        with open(path, 'rb') as f:
            head = f.read(9)
        if _is_safetensors(path, head, path.stat().st_size):
            from safetensors.torch import load_file

            device = map_location if isinstance(map_location, (str, torch.device)) else 'cpu'
            return load_file(str(path), device=str(device))
        kwargs = dict(mmap=True) if mmap and head[:4] == b'PK\x03\x04' else {}
        try:
            return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
        except Exception as err:
            translated = checkpoint_error(path, err)
            if translated is None:  # intact and safe, yet unreadable: still name the file
                translated = CorruptCheckpointError(
                    f"cannot load checkpoint {path}: {type(err).__name__}: {err}")
            raise translated from err


# Wrappers a saved state dict is found under: Lightning's and most trainers' 'state_dict', timm's and
# DeiT's 'model', timm's EMA weights 'state_dict_ema'; the first one present is taken.
_STATE_DICT_WRAPPERS = ('state_dict', 'model', 'state_dict_ema')


def model_state_dict(checkpoint: Any, prefix: str = 'model.', source: PathLike = 'checkpoint') -> dict:
    """A model's weights out of what a checkpoint file holds (``load_checkpoint_file``'s result).

    ``checkpoint`` is a plain state dict, one under a ``{'state_dict' | 'model' | 'state_dict_ema': ...}``
    wrapper, or a Lightning checkpoint: there the LightningModule keeps the model under ``prefix``
    (``model.`` for ``ImageClassifier``, ``transformer.`` for ``DiffusionModule``), and when any key has
    that prefix only those keys are kept, without it (the rest belongs to other modules, e.g. an EMA
    copy). torch.compile's ``_orig_mod.`` is dropped from the keys. ``source`` names the file in errors.
    """
    if isinstance(checkpoint, dict):
        for key in _STATE_DICT_WRAPPERS:
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{source}: no state dict found (expected a dict of tensors, or one under "
                         f"{' / '.join(repr(k) for k in _STATE_DICT_WRAPPERS)})")
    state = {k.replace('_orig_mod.', ''): v for k, v in checkpoint.items()}
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


# ------------------------------------------------------------------------------------------------
# What a standard -> differential weight mapping did (the ViT and DiT loaders' report)
# ------------------------------------------------------------------------------------------------

@dataclass
class WeightMapping:
    """What loading a standard-attention checkpoint into a model did, key by key."""
    copied: List[str] = field(default_factory=list)      # model keys copied verbatim
    resampled: List[str] = field(default_factory=list)   # model keys resized (ViT pos/patch embed)
    converted: List[str] = field(default_factory=list)   # model keys built from the checkpoint by a rule
    kept_init: List[str] = field(default_factory=list)   # model keys the checkpoint cannot supply
    dropped: List[str] = field(default_factory=list)     # checkpoint keys not loaded
    rules: List[str] = field(default_factory=list)       # how the attention heads were mapped
    notes: List[str] = field(default_factory=list)       # what else differs from the checkpoint's model

    @property
    def mapped(self) -> List[str]:
        return self.copied + self.resampled + self.converted

    def __str__(self) -> str:
        parts = [f"{len(self.copied)} tensors copied"]
        if self.resampled:
            parts.append(f"{len(self.resampled)} resampled ({', '.join(self.resampled)})")
        if self.converted:
            parts.append(f"{len(self.converted)} converted ({_summarise(self.converted)})")
        parts += [f"{len(self.kept_init)} kept their init ({_summarise(self.kept_init)})",
                  f"{len(self.dropped)} checkpoint tensors dropped ({_summarise(self.dropped)})"]
        return ", ".join(parts) + "".join(f"\n  {line}" for line in self.rules + self.notes)


def _summarise(keys: List[str]) -> str:
    """Collapse block indices (``blocks.<i>.``, ``transformer_blocks.<i>.``) so the 60 λ keys of a 12-block
    model read as 5 names."""
    names = sorted({re.sub(r'blocks\.\d+\.', 'blocks.*.', k) for k in keys})
    return ', '.join(names) or '-'
