"""``python -m unclip.convert kind=KIND src=DIR out=PATH``."""

from unclip.convert import ConversionError, main

if __name__ == "__main__":
    try:
        main()
    except ConversionError as error:
        raise SystemExit(f"unclip.convert: {error}") from error
