"""Document filters: each scores into attributes, then keeps or drops with a reason."""
