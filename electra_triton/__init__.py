"""electra-triton: Triton kernels for ELECTRA pre-training, drop-in for Hugging Face transformers."""

import importlib.util
import pathlib
import sys

__version__ = "0.1.0"


def _map_source_tree_kernels() -> None:
    # Installed (wheel or editable), setuptools maps the repository's kernels/ folder to electra_triton.kernels.
    # Run straight from a checkout (PYTHONPATH=repo, as on the offline GPU machine), that mapping does not exist:
    # load the folder under the same name so that imports are identical in both cases.
    if importlib.util.find_spec(__name__ + ".kernels") is not None:
        return
    folder = pathlib.Path(__file__).resolve().parent.parent / "kernels"
    spec = importlib.util.spec_from_file_location(
        __name__ + ".kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"electra_triton.kernels not found (looked in {folder})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_map_source_tree_kernels()

from .integration import apply_to_transformers, fused_modules, patch, revert_transformers, unpatch  # noqa: E402, F401
