"""The shipped configs, installed as the package ``distmnist.configs`` (see pyproject.toml): ``-c smoke`` finds
smoke.yaml through importlib.resources in a wheel install and in an editable one. This file makes it a regular
package: setuptools' editable finder cannot import a namespace package mapped by package-dir
(pypa/setuptools#4943).
"""
