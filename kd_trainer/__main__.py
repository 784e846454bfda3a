"""``python -m kd_trainer RECIPE [overrides]`` runs a recipe; ``python -m kd_trainer <command>`` the CLI."""

from kd_trainer.cli import main

if __name__ == "__main__":
    main()
