"""One module per command: parse -> config -> library call -> print."""
