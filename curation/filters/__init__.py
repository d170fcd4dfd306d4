"""Document filters and line modifiers: URL blocklists and the Gopher / C4 / FineWeb heuristics."""
