"""PFJet-SSD client SDK and CLI (light dependencies only). Implementation lands with the client issue."""
