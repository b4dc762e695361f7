"""atheris harness: fuzz/targets.py check_group (see fuzz/README.rst)."""

from harness import main

if __name__ == "__main__":
    main("group")
