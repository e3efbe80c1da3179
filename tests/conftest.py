import os
import sys
from pathlib import Path

# megatron's fused ops go through torch.compile: seconds per op per process on CPU.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
