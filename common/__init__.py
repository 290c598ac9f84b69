"""The ground floor: small helpers every stage shares. Nothing here imports another package of this repo."""
