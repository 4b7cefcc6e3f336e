"""Example models the README and the notebooks show, importable as they are written:
``--model-fn jaxmp.examples.digits:digits_model`` trains the README's model with no file of your own."""
