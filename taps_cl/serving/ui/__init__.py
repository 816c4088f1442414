"""The read-only web overview of a registry: server-rendered pages, every asset shipped here."""
