"""Development material made by project code: random-weight models and sample documents."""
