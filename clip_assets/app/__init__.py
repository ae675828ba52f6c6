"""The web app for people (`clip-assets serve`): search, the gallery, near-duplicates and review, one navigation."""
