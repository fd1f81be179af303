"""proxy-agent: the node side of the Konnectivity tunnel."""
