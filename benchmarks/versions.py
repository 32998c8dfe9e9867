"""Print, on one line, the versions a GPU record depends on (what a results folder's versions note holds)."""
import importlib

import torch
import triton


def version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except ImportError:
        return "absent"


if __name__ == "__main__":
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "tvm", version("tvm"),
          "optuna", version("optuna"), "gpu", gpu)
