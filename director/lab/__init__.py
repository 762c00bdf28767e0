"""The lab: traffic crafting and (later) the network-namespace topology for tests and the demo."""
