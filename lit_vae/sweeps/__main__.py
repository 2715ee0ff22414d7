"""``python -m lit_vae.sweeps [name ...]``: print the paths of the shipped W&B sweep files."""

from lit_vae.sweeps import main

raise SystemExit(main())
