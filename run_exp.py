"""The seed's entry point: `python run_exp.py -m ++dataset_name=... +init=gradient +peft=qv ...` (see conf/)."""

from lorafa.cli import main

if __name__ == "__main__":
    main()
