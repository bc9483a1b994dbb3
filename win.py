import os, signal, time, sys
import lmtool.display as d
orig = d.TrainDisplay._on_resume
def patched(self, e):
    orig(self, e)
    os.kill(os.getpid(), signal.SIGTERM); time.sleep(2)
d.TrainDisplay._on_resume = patched
from lmtool.cli import main
main(["train", "--resume", "runs/w"])
