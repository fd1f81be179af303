"""proxy-server: the control-plane side of the Konnectivity tunnel."""
