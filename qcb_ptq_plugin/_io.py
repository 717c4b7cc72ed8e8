"""Loading files that may come from an attacker, and writing outputs atomically.

The model file is hostile input (the attacker trains the float model). Loading it must run no
code from it:

* ``.pt2`` (``torch.export.save``): the archive is inspected before ``torch.export.load`` sees
  it. Refused: pickled payloads (weights/constants saved with ``use_pickle``, custom or opaque
  objects, legacy ``.pt`` members, AOTInductor binaries), sample inputs that only unpickle with
  ``weights_only=False`` (torch falls back to it), and text that torch evaluates as Python:
  symbolic-shape expressions (``sympy.sympify``), guard code (``exec``) and node targets (any
  attribute of ``torch``, e.g. ``torch.os.system``). torch then loads the same bytes we checked.
* pickled ``nn.Module`` files (``torch.save(model)``): unpickling runs code by design, so they
  are refused unless the caller opts in (``trust_code=True``, the CLI's ``--trust-model-code``).
* ``.npy`` / ``.npz``: ``allow_pickle=False``.

Every output goes through :func:`atomic_output`: a temporary file in the destination folder,
written, flushed to disk, validated by the caller, then renamed over the destination. A run
that fails or is interrupted leaves the previous file as it was. :func:`check_output` checks a
destination before any work. Errors are one line that names the problem and the fix.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import secrets
import tokenize
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["FileError", "UnsafeFileError", "load_exported_program", "load_module_file", "load_array_file",
           "check_output", "atomic_output", "write_text"]

SAFE_FORMATS = ("torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},)), "
                "'model.pt2') with plain tensors, an ONNX file (qcb-ptq onnx), or a state_dict plus the model's "
                "code (Python API)")


class FileError(ValueError):
    """A file or path the user gave cannot be used (missing, corrupt, wrong kind, not writable)."""


class UnsafeFileError(FileError):
    """Loading the file would run code stored in it."""


# ---------------------------------------------------------------------------------------------
# inputs


def _existing_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileError(f"{what} {path} does not exist; check the path")
    if path.is_dir():
        raise FileError(f"{what} {path} is a directory; pass the file itself")
    return path


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise FileError(f"cannot read {what} {path} ({e.strerror}); check its permissions") from e


# .pt2 -----------------------------------------------------------------------------------------

_PT2_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_OP_TARGET = re.compile(rf"torch\.ops\.({_IDENT})\.({_IDENT})\.{_IDENT}")
# operator namespaces a float or PT2E-quantized program uses; aten ops that touch files are out
_OP_NAMESPACES = {"aten", "prims", "quantized_decomposed", "higher_order", "torchao", "quantized"}
_FILE_OPS = {("aten", "save"), ("aten", "from_file")}
# plain Python callables torch serializes by name; _operator's attrgetter/methodcaller/call are out
_PLAIN_TARGET = re.compile(r"_operator\.(getitem|add|sub|mul|truediv|floordiv|mod|pow|neg|pos|abs|eq|ne|lt|le|gt|ge|"
                           r"and_|or_|xor|not_|invert|lshift|rshift|matmul|truth|index)|math\.[a-z0-9_]+|"
                           r"torch\.sym_[a-z_]+")
_SYMBOL = re.compile(r"[a-z]+[0-9]+")  # torch's shape symbols: s0, u3, ...
# names torch's deserializer hands to sympy.sympify (its sympy_functions) and what str(expr) prints
_SYMPY_NAMES = {
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "Symbol", "Integer", "Float",
    "Rational", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Mul", "Add", "Pow",
    "oo", "zoo", "nan", "True", "False", "positive", "negative", "nonnegative", "integer", "real", "finite",
}
_GUARD_NAMES = {"L", "size", "stride", "storage_offset", "dim", "and", "or", "not", "True", "False", "None"}
_ALLOWED_OPS = {"+", "-", "*", "/", "//", "%", "**", "(", ")", ",", "=", "==", "!=", "<", "<=", ">", ">="}


def _check_text(text: str, names: set[str], extra_ops: set[str], path: Path, where: str) -> None:
    """``text`` is an expression over allowed names, numbers and operators; raise otherwise."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError) as e:
        raise UnsafeFileError(f"{path}: {where} {text[:60]!r} is not an expression torch writes ({e}); "
                              f"refusing to load it. Re-export the model: {SAFE_FORMATS}") from e
    for tok in tokens:
        ok = (tok.type in (tokenize.NUMBER, tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)
              or (tok.type == tokenize.NAME and (tok.string in names or _SYMBOL.fullmatch(tok.string)))
              or (tok.type == tokenize.OP and tok.string in _ALLOWED_OPS | extra_ops)
              or (tok.type == tokenize.STRING and re.fullmatch(r"'[A-Za-z0-9_]*'|\"[A-Za-z0-9_]*\"", tok.string)))
        if not ok:
            raise UnsafeFileError(f"{path}: {where} {text[:80]!r} holds {tok.string!r}, which torch would evaluate "
                                  f"as Python code; refusing to load it. Re-export the model: {SAFE_FORMATS}")


def _check_target(target: str, path: Path) -> None:
    """Node targets resolve by getattr from ``torch``/``operator``/``math``: only operator overloads
    of the expected namespaces and a few arithmetic callables are allowed."""
    m = _OP_TARGET.fullmatch(target)
    ok = (m is not None and m.group(1) in _OP_NAMESPACES and (m.group(1), m.group(2)) not in _FILE_OPS
          and "__" not in target) or _PLAIN_TARGET.fullmatch(target) is not None
    if not ok:
        raise UnsafeFileError(f"{path}: the graph calls {target!r}, which is not an allowed torch operator; refusing "
                              f"to load it (it could run Python code or touch files). Re-export the model: "
                              f"{SAFE_FORMATS}")


def _walk_program(obj, path: Path) -> None:
    """Check every field of a serialized ExportedProgram that torch turns into code."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "expr_str" and isinstance(v, str):
                _check_text(v, _SYMPY_NAMES, set(), path, "a shape expression")
            elif k in ("target", "as_operator") and isinstance(v, str):
                _check_target(v, path)
            elif k == "guards_code" and isinstance(v, list):
                for g in v:
                    _check_text(str(g), _GUARD_NAMES, {"[", "]", "."}, path, "a guard")
            else:
                _walk_program(v, path)
    elif isinstance(obj, list):
        for v in obj:
            _walk_program(v, path)


def _pickled_payloads(config: dict, base: str) -> list[str]:
    bad = []
    for fqn, meta in config.get("config", {}).items():
        name = str(meta.get("path_name", ""))
        if meta.get("use_pickle") or not name.startswith(("weight_", "tensor_")) or meta.get("tensor_meta") is None:
            bad.append(f"{fqn} ({base}{name})")
    return bad


def _inspect_pt2(path: Path, data: bytes) -> bool:
    """Raise unless the archive is a torch.export.save file whose loading runs nothing from it.

    Returns whether the graph uses ``quantized_decomposed`` ops (registered by torchao)."""
    not_pt2 = (f"{path} is not a torch.export archive, or it is corrupt or truncated; re-save it with "
               "torch.export.save(exported_program, 'model.pt2')")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
        bad_crc = zf.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise FileError(f"{not_pt2} ({e})") from e
    if bad_crc is not None:
        raise FileError(f"{not_pt2} (member {bad_crc} fails its CRC check)")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise UnsafeFileError(f"{path} holds the same member twice (an ambiguous archive); refusing to load it. "
                              f"Re-save it with torch.export.save")
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise FileError(f"{not_pt2} (expected one top-level folder)")
    root = roots.pop() + "/"
    rel = {n[len(root):]: n for n in names}
    if "serialized_exported_program.json" in rel or "version" in rel:
        raise UnsafeFileError(f"{path} uses the torch<2.7 export format, which unpickles its weights; re-save it "
                              "with torch.export.save on torch>=2.7")
    if "archive_format" not in rel or zf.read(rel["archive_format"]).strip() != b"pt2":
        raise FileError(not_pt2)

    allowed = set(_PT2_FIXED)
    refused: list[str] = []
    models = [r for r in rel if r.startswith("models/") and r.endswith(".json")]
    if not models:
        raise FileError(f"{not_pt2} (no models/*.json)")
    uses_qdq = False
    for r in models:
        allowed.add(r)
        model = r[len("models/"):-len(".json")]
        try:
            program = json.loads(zf.read(rel[r]))
        except (ValueError, UnicodeDecodeError) as e:
            raise FileError(f"{not_pt2} ({r} is not JSON: {e})") from e
        _walk_program(program, path)
        uses_qdq |= b"quantized_decomposed" in zf.read(rel[r])
        for base, cfg_name in (("data/weights/", f"data/weights/{model}_weights_config.json"),
                               ("data/constants/", f"data/constants/{model}_constants_config.json")):
            if cfg_name not in rel:
                raise FileError(f"{not_pt2} ({cfg_name} is missing)")
            allowed.add(cfg_name)
            try:
                cfg = json.loads(zf.read(rel[cfg_name]))
            except (ValueError, UnicodeDecodeError) as e:
                raise FileError(f"{not_pt2} ({cfg_name} is not JSON: {e})") from e
            refused += _pickled_payloads(cfg, base)
            allowed |= {base + str(m.get("path_name")) for m in cfg.get("config", {}).values()}
        sample = f"data/sample_inputs/{model}.pt"
        if sample in rel:  # torch tries weights_only=True, then falls back to a full unpickle
            allowed.add(sample)
            _check_weights_only(zf.read(rel[sample]), path, f"its sample inputs ({sample})")
    refused += sorted(r for r in rel if r not in allowed and not r.startswith("extra/"))
    if refused:
        raise UnsafeFileError(
            f"{path} holds pickled or executable members ({', '.join(refused[:4])}{', ...' if len(refused) > 4 else ''}): "
            f"loading them runs code from the file. Give a safe file instead: {SAFE_FORMATS}")
    return uses_qdq


def _check_weights_only(blob: bytes, path: Path, what: str) -> None:
    import torch

    try:
        torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(f"{path}: {what} only unpickle with code execution allowed; refusing to load them. "
                              f"Give a safe file instead: {SAFE_FORMATS}") from e
    except Exception as e:  # noqa: BLE001 - any failure here means a damaged member
        raise FileError(f"{path}: {what} cannot be read ({type(e).__name__}); the file is corrupt or truncated, "
                        "re-save it with torch.export.save") from e


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """torch.export.load logs a full traceback before raising; the caller reports one line."""
    logger = logging.getLogger(logger_name)
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old)


def load_exported_program(path: str | Path):
    """``torch.export.load`` of a ``.pt2`` file after checking that loading it runs no code from it.

    Raises :class:`UnsafeFileError` (pickled members, Python text torch would evaluate) or
    :class:`FileError` (missing, corrupt, truncated, not a ``.pt2``).
    """
    import torch

    path = _existing_file(path, "model file")
    data = _read_bytes(path, "model file")
    if _inspect_pt2(path, data):  # purified INT8 programs call torch.ops.quantized_decomposed.*
        _register_quantized_decomposed()
    try:
        with _quiet("torch.export"):
            return torch.export.load(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged archive
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileError(f"{path}: torch.export.load failed ({type(e).__name__}: {msg[:200]}); the file is corrupt, "
                        "from another torch version, or uses custom ops that are not registered") from e


def _register_quantized_decomposed() -> None:
    try:
        import torchao  # noqa: F401  (registers torch.ops.quantized_decomposed)
    except ImportError:
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (torch's own registration)


# pickled modules ------------------------------------------------------------------------------


def load_module_file(path: str | Path, trust_code: bool = False):
    """A pickled ``nn.Module`` (``torch.save(model)``).

    Without ``trust_code`` the file is only read with ``torch.load(weights_only=True)``, which
    runs no code but cannot rebuild a module: a module file is then refused with the ways to
    get a safe file; a state_dict is refused with the same advice. TorchScript files are
    refused (they cannot be re-quantized). With ``trust_code=True`` the file is unpickled in
    full: it runs whatever code the file holds.
    """
    import torch

    path = _existing_file(path, "model file")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            with zipfile.ZipFile(path) as zf:
                members = zf.namelist()
                bad = zf.testzip()
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise FileError(f"{path} is corrupt or truncated ({e}); save the model again") from e
        if any(m.endswith("/constants.pkl") or "/code/" in m for m in members):
            raise FileError(f"{path} is a TorchScript file; TorchScript modules cannot be re-quantized by torch.ao or "
                            "PT2E. Save the float model with torch.export.save(torch.export.export(model, (x,)), "
                            "'model.pt2') instead")
        if bad is not None:
            raise FileError(f"{path} is corrupt or truncated (member {bad} fails its CRC check); save the model again")
    if not trust_code:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeFileError(
                f"{path} is a pickled model: loading it runs code from the file. Pass --trust-model-code (Python: "
                f"trust_code=True) only if you trust its source, or give a safe file: {SAFE_FORMATS}") from e
        except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
            raise FileError(f"{path} is not a readable torch.save file ({type(e).__name__}); it is corrupt or "
                            "truncated, save the model again") from e
        raise FileError(f"{path} holds a {type(obj).__name__}, not a model (a state_dict?); load it into the model "
                        f"in Python and save a safe file: {SAFE_FORMATS}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise FileError(f"{path} is not a readable torch.save file ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}); it is corrupt or "
                        "truncated, save the model again") from e
    if isinstance(obj, torch.jit.ScriptModule):
        raise FileError(f"{path} is a TorchScript module; it cannot be re-quantized. Save the float nn.Module or an "
                        "exported program (.pt2)")
    if not isinstance(obj, torch.nn.Module):
        raise FileError(f"{path} holds a {type(obj).__name__}, not a model; save the nn.Module itself "
                        "(torch.save(model)) or an exported program (.pt2)")
    return obj


# arrays ---------------------------------------------------------------------------------------


def load_array_file(path: str | Path) -> np.ndarray | dict[str, np.ndarray]:
    """``.npy`` -> array; ``.npz`` -> {name: array}. Never unpickles (``allow_pickle=False``)."""
    path = _existing_file(path, "calibration file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UnsafeFileError(f"{path} holds pickled Python objects (loading them runs code); save plain numeric "
                                  "arrays with np.save / np.savez") from e
        raise FileError(f"{path} is not a readable {path.suffix} file ({e}); it is corrupt or truncated, save the "
                        "arrays again") from e
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise FileError(f"{path} is not a readable {path.suffix} file ({type(e).__name__}: {e}); it is corrupt or "
                        "truncated, save the arrays again") from e


# ---------------------------------------------------------------------------------------------
# outputs


def check_output(path: str | Path, what: str = "output") -> Path:
    """Check, before any work, that ``path`` can be written: not a directory, its folder exists (it
    is created if missing) and accepts new files. Returns ``path`` as a :class:`Path`."""
    path = Path(path)
    if path.is_dir():
        raise FileError(f"{what} {path} is a directory; pass a file path inside it, e.g. {path / ('out' + (path.suffix or ''))}")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileError(f"cannot create the folder {parent} for {what} {path} ({e.strerror}); choose a writable "
                        "location") from e
    probe = parent / f".{path.name}.{secrets.token_hex(4)}.probe"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise FileError(f"cannot write {what} {path}: its folder {parent} is not writable ({e.strerror}); choose a "
                        "writable location or fix the permissions") from e
    return path


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems do not sync directories
        if not directory:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | Path, what: str = "output") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit, flush it and rename it over ``path``.

    Write (and validate) the file at the yielded path inside the block. An exception or an
    interrupt inside the block removes the temporary file and leaves ``path`` untouched. The
    temporary name keeps the suffix (writers such as matplotlib pick the format from it).
    """
    path = check_output(path, what)
    tmp = path.parent / f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # umask applies, as for a plain open
    try:
        yield tmp
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise FileError(f"writing {what} {path} produced no data; nothing was replaced")
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync(path.parent, directory=True)
    log.info("wrote %s", path)


def write_text(path: str | Path, text: str, what: str = "output") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_output`)."""
    path = Path(path)
    with atomic_output(path, what) as tmp:
        tmp.write_text(text)
    return path
