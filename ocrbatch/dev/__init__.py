"""Development material made by project code: random-weight checkpoints and sample documents."""
