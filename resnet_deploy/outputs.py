"""Where the commands write, checked before any work: a bad --out or --output fails at once, in one sentence
that names the flag, not with an errno after minutes of training or inference."""
import os
from pathlib import Path
from typing import Union


def output_directory(out: Union[str, Path], flag: str = "--out") -> Path:
    """out as a directory, created with its parents when missing."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, a read-only file system, no permission
        raise OSError(f"{flag} {out} cannot be used as the output directory ({error.strerror}); expected a "
                      f"directory, or a path where one can be created") from error
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {out} is a directory this process cannot write to; expected a writable one")
    return out


def check_output_directory(out: Union[str, Path], flag: str = "--out") -> None:
    """out can become the output directory (output_directory creates it), without creating anything yet."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{flag} {out} is a file; expected a directory, or a path where one can be created")
    existing = next(parent for parent in (out, *out.absolute().parents) if parent.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {out} cannot be created: {existing} is a file; expected a directory, or a "
                                 f"path where one can be created")
    if out.is_symlink() and not out.exists():
        raise NotADirectoryError(f"{flag} {out} is a link to nothing; expected a directory, or a path where one can "
                                 f"be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {out} cannot be created or written in {existing} by this process; expected "
                              f"a writable place")


def check_output_file(path: Union[str, Path], flag: str = "--output") -> None:
    """path can be written as a file: not a directory, in an existing folder this process can write to."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a directory; expected a file name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder of {flag} {path} does not exist; expected an existing folder")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"the folder of {flag} {path} cannot be written to by this process; expected a "
                              f"writable folder")
