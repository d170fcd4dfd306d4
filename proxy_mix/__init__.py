"""proxy_mix."""
