"""Inputs: files to views. Walk the folders, decode each file (on CPU workers or the device),
cut tiles, and batch uint8 views for the encoder."""
