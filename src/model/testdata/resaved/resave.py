import sys, json, os, shutil, tempfile, transformers
from transformers import AutoConfig
src = sys.argv[1]; out = sys.argv[2]
d = tempfile.mkdtemp()
shutil.copy(src, os.path.join(d, "config.json"))
cfg = AutoConfig.from_pretrained(d)
o = tempfile.mkdtemp()
cfg.save_pretrained(o)
shutil.copy(os.path.join(o, "config.json"), out)
print(transformers.__version__, "ok")
