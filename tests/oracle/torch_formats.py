"""The same V-Net weights written by real PyTorch in its own formats, for uamt's test that every
weights source gives the checkpoint path's model (tests/eval_infer.rs).

The reference V-Net of uamt_oracle.py (with a forward that TorchScript can compile: eval mode,
no Monte-Carlo masks) is loaded with WEIGHTS (a state_dict `.pt` as `uamt export` writes it, read
with torch.load(weights_only=True), load_state_dict strict) and saved as:
  state_dict.pt      torch.save(net.state_dict())
  state_dict_p4.pt   the same with pickle_protocol=4
  parameters.pth     torch.save of named parameters (nn.Parameter) and buffers
  script.pt          torch.jit.script(net).save()
  trace.pth          torch.jit.trace(net, x).save()
  script.weights     the scripted module again, under a name that says nothing of its format
  whole_module.pt    torch.save(net): a pickled Python object (uamt must refuse it)
  legacy.pt          torch.save(..., _use_new_zipfile_serialization=False) (refused: too old)
  evil.pt            a state_dict with one more entry whose __reduce__ calls os.system (refused;
                     the command, if it ever ran, would create OUT_DIR/pwned)

Usage: torch_formats.py WEIGHTS N_FILTERS OUT_DIR
"""
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from uamt_oracle import VNet  # noqa: E402


class Evil:
    """Unpickling this runs a shell command, as `pickle.load` and `torch.load(weights_only=False)` would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class ScriptableVNet(VNet):
    """The oracle V-Net in eval mode (dropout is the identity), in a form TorchScript compiles."""

    def forward(self, x):
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.dropout(self.block_five(self.block_four_dw(x4)))
        x6 = self.block_six(self.block_five_up(x5) + x4)
        x7 = self.block_seven(self.block_six_up(x6) + x3)
        x8 = self.block_eight(self.block_seven_up(x7) + x2)
        x9 = self.dropout(self.block_nine(self.block_eight_up(x8) + x1))
        return self.out_conv(x9)


def main():
    weights, nf, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.makedirs(out, exist_ok=True)
    net = ScriptableVNet(nf=nf)
    net.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    net.eval()
    p = lambda name: os.path.join(out, name)  # noqa: E731
    torch.save(net.state_dict(), p("state_dict.pt"))
    torch.save(net.state_dict(), p("state_dict_p4.pt"), pickle_protocol=4)
    both = dict(net.named_parameters())
    both.update(dict(net.named_buffers()))
    torch.save(both, p("parameters.pth"))
    torch.jit.script(net).save(p("script.pt"))
    with torch.no_grad():
        torch.jit.trace(net, torch.randn(1, 1, 16, 16, 16)).save(p("trace.pth"))
    shutil.copy(p("script.pt"), p("script.weights"))
    torch.save(net, p("whole_module.pt"))
    torch.save(net.state_dict(), p("legacy.pt"), _use_new_zipfile_serialization=False)
    evil = dict(net.state_dict())
    evil["x"] = Evil(p("pwned"))
    torch.save(evil, p("evil.pt"))


if __name__ == "__main__":
    main()
