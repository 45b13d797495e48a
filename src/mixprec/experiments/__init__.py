"""Experiments on real data: data sets installed from Debian packages and the models the
recipe comparison trains. Nothing in the library imports from here."""
